#!/usr/bin/env bash
# Retrain the shipped models (the zoo) from scratch, with the exact commands their config.json
# records. `make zoo` runs this into src/vitcompress/zoo/; ZOO_OUT puts them elsewhere.
# Times on 2 CPU cores: see each model's metrics.json (train_wall_s).
set -euo pipefail
OUT="${ZOO_OUT:-src/vitcompress/zoo}"
VC="${VC:-.venv/bin/vitcompress}"
FORCE="${FORCE:---force}"
mkdir -p "$OUT"
# DeiT's CNN teacher (study A trains a ResNet-50 to convergence first)
$VC train --model resnet-micro --epochs 8 --batch-size 128 --lr 2e-3 --warmup-epochs 0.5 \
    --augment flip --out "$OUT/resnet-micro-fmnist" $FORCE
# the nano pair: the README's Fashion-MNIST numbers come from this vit-nano recipe
$VC train --model vit-nano --epochs 30 --batch-size 64 --lr 1.5e-3 --warmup-epochs 2 \
    --augment flip --out "$OUT/vit-nano-fmnist" $FORCE
$VC train --model deit-nano --epochs 30 --batch-size 64 --lr 1.5e-3 --warmup-epochs 2 \
    --augment flip --teacher "$OUT/resnet-micro-fmnist" --distill hard \
    --out "$OUT/deit-nano-fmnist" $FORCE
# the larger pair (study A's size axis: the larger model sparse against the smaller dense)
$VC train --model vit-micro --epochs 10 --batch-size 64 --lr 1e-3 --warmup-epochs 1 \
    --augment flip --out "$OUT/vit-micro-fmnist" $FORCE
$VC train --model deit-micro --epochs 10 --batch-size 64 --lr 1e-3 --warmup-epochs 1 \
    --augment flip --teacher "$OUT/resnet-micro-fmnist" --distill hard \
    --out "$OUT/deit-micro-fmnist" $FORCE
