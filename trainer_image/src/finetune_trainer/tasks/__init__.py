"""One module per training task; the loop (finetune_trainer.loop) stays task-agnostic."""
