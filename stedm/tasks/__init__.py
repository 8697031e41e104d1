"""What each entry script does, one function per script; the scripts only parse the config."""
