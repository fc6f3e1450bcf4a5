"""The generation stage: batched chat generation (`batched`), its CUDA fast path (`fast`), the on-disk cache that
makes an interrupted evaluation resume where it stopped (`cache`), and the evaluation's engines (`engines`,
`eval.engine`): one request list (`requests`) fed to HF `generate` or to a vLLM engine (`vllm_engine`)."""
