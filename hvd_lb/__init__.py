"""hvd_lb: large-batch optimizers for Horovod."""
