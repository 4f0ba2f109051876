"""Sources: each turns a real format (or the simulator) into ScenePool rows."""
