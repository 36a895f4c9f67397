"""The one training engine every stage runs on (pretrain, finetune, distill)."""
