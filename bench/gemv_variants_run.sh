#!/bin/bash
# One GPU call: the variants bench on GPU 1, then the decode bench with the best variant there,
# while GPU 0 runs the decode bench with today's kernel. Logs and JSON under $OUT.
# END (epoch seconds): nothing runs past it.
set -o pipefail
L=${DECODE_LAYERS:-64}
END=${END:-$(( $(date +%s) + 200 ))}
left() { local l=$(( END - $(date +%s) )); echo $(( l < $1 ? l : $1 )); }
(CUDA_VISIBLE_DEVICES=0 KOIFISH_GEMV4=a_today timeout $(left 150) python3 bench/bench_qwen3_decode.py --layers $L --contexts '' \
    --out $OUT/decode_a_today.json > $OUT/decode_a_today.log 2>&1; echo "rc $?" >> $OUT/decode_a_today.log) &
CUDA_VISIBLE_DEVICES=1 timeout $(left 100) python3 bench/bench_quant_gemv.py --variants --out $OUT/gemv_variants.json 2>&1 | tee $OUT/gemv_variants.log
best=$(python3 -c "import json;print(json.load(open('$OUT/gemv_variants.json'))['best'])" 2>/dev/null || echo a_today)
echo "best: $best; $(left 999) s left"
CUDA_VISIBLE_DEVICES=1 KOIFISH_GEMV4=$best timeout $(left 150) python3 bench/bench_qwen3_decode.py --layers $L --contexts '' \
    --out $OUT/decode_best.json 2>&1 | tee $OUT/decode_best.log
wait
echo "== today's kernel:"; tail -7 $OUT/decode_a_today.log
