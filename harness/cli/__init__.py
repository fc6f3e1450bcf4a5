"""The `harness` command (`main`) and its `judges` sub-commands (`judges`)."""
