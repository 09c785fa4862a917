"""The long-running autonat daemon: configuration, mapping upkeep and the control interface."""
