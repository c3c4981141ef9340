"""cifar100-dvc: one module per DVC stage plus the few shared modules they import."""
