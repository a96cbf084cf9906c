"""kopf handlers; importing this package registers them."""

from finetune_operator.handlers import (
    finetunejob,
    indexes,
    modeldeployment,
    serving_children,
    trainer_children,
)

__all__ = ["finetunejob", "indexes", "modeldeployment", "serving_children", "trainer_children"]
