"""The judging stage: every judge, the registry and the one factory every command uses (`registry`), and
judge validation against human labels (`validation`)."""
