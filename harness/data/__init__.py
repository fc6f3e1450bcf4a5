"""The data stage: the dataset registry and its loaders (`registry`), user-declared datasets from the YAML
(`user`), the procedure formats of Study B (`formats`) and Study A's self-generated fine-tuning set (`selfgen`)."""
