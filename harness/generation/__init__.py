"""The generation stage: batched chat generation (`batched`), its CUDA fast path (`fast`), the on-disk cache that
makes an interrupted evaluation resume where it stopped (`cache`), and how a state's planned generations become
one request list (`requests`) run through HF `generate` (`engines`)."""
