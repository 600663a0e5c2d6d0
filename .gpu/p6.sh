python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/pip.txt 2>&1
timeout 60 python3 .gpu/rope.py > $OUT/rope.txt 2>&1
timeout 150 python3 scripts/profile_prefill.py --config qwen2.5-vl-7b --batch 8 --image-size 1008 --dtype bfloat16 --compile-tower --budget 162 --methods flowcut random --trace-dir $OUT/traces > $OUT/prof_flowcut.txt 2>&1
cat $OUT/rope.txt; grep -h "=====\|without the profiler\|Self CUDA time total" $OUT/prof_flowcut.txt
