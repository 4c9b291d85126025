"""A recipe's settings: argument dataclasses, YAML and command line parsed, each rule checked before any load."""
