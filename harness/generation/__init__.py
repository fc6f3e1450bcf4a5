"""The generation stage: batched chat generation (`batched`), its CUDA fast path (`fast`) and the on-disk
cache that makes an interrupted evaluation resume where it stopped (`cache`)."""
