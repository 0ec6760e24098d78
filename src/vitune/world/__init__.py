"""The synthetic world: procedurally rendered scenes, their symbolic annotations and stand-in backbones."""
