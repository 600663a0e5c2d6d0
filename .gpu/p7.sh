python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/pip.txt 2>&1
timeout 50 python3 -m pytest -q -p no:warnings tests/methods/test_flowcut.py > $OUT/gpu_tests.txt 2>&1
timeout 120 python3 scripts/profile_prefill.py --config qwen2.5-vl-7b --batch 8 --image-size 1008 --dtype bfloat16 --compile-tower --budget 162 --methods flowcut random --rows 12 > $OUT/prof_flowcut.txt 2>&1
tail -n 2 $OUT/gpu_tests.txt; grep -h "=====\|without the profiler\|Self CUDA time total" $OUT/prof_flowcut.txt
