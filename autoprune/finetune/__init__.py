"""Fine-tuning a pruned model with distillation from the dense teacher (:mod:`~autoprune.finetune.loop`),
and the cached dense baseline of the offline default (:mod:`~autoprune.finetune.baseline`)."""
