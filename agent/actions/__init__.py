"""One module per user-visible command; the module name is the command name."""
