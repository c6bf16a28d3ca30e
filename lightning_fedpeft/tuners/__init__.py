"""Parameter-efficient modules written here because peft has no equivalent (see each subpackage)."""
