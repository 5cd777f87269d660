"""Fine-tuning recipes: the downstream protocols the field reports its numbers with.

    clasp finetune reid --checkpoint clasp-vit-s.safetensors --data /data/market1501 \\
        --format market --out runs/market model.img_size=[256,128]

One file per recipe (`reid`, `attributes`, `parsing`, `pose`), each a `Recipe` of
`clasp.finetune.run`, sharing the pre-training loop (`clasp.train.loop.TrainingLoop`) through
`FinetuneStep`: checkpoints and --resume, metrics, plots, TensorBoard, DDP, bf16 on CUDA.
Starting weights and the fine-tuned model file: `clasp.finetune.weights`.
"""
