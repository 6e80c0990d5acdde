#!/bin/bash
# A model split over every GPU of this machine, started as two separate launches, as two hosts would start it:
# launch A runs ranks 0..N/2-1 on the first half of the GPUs, launch B the others on the second half. They find each
# other through the rendezvous (MASTER_ADDR:MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK: torchrun's variables), and
# NCCL_HOSTID tells NCCL that the halves are different machines (SAME_HOST=1: one machine). Rank 0's text is then
# compared with one GPU's. Usage: scripts/two_launches.sh [ep|etp]   (run from the repository root)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
N=$(nvidia-smi -L | wc -l); H=$((N / 2))
A=$(seq -s, 0 $((H - 1))); B=$(seq -s, $H $((N - 1)))
PROMPT="Tell me about the sea"
ARGS="generate --nvidia $N --experts ${1:-etp} --temperature 0 --max-steps 48"
OUT=$(mktemp -d)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 WORLD_SIZE=$N NCCL_SOCKET_IFNAME=lo
for ((r = N - 1; r >= 0; r--)); do
  if ((r >= H)); then host=hostB gpus=$B local=$((r - H)); else host=hostA gpus=$A local=$r; fi
  [ "$SAME_HOST" = 1 ] && host=one
  NCCL_HOSTID=$host CUDA_VISIBLE_DEVICES=$gpus RANK=$r LOCAL_RANK=$local \
    python -m qwen3moe $ARGS "$PROMPT" > "$OUT/rank$r.txt" &
done
wait
unset WORLD_SIZE MASTER_PORT RANK
python -m qwen3moe generate --nvidia --temperature 0 --max-steps 48 "$PROMPT" > "$OUT/one_gpu.txt"
echo "--- $N ranks, two launches:"; cat "$OUT/rank0.txt"; echo "--- one GPU:"; cat "$OUT/one_gpu.txt"
cmp -s "$OUT/rank0.txt" "$OUT/one_gpu.txt" && echo "same text" || { echo "the texts differ"; exit 1; }
