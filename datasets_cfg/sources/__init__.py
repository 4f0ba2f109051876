"""Sources: each turns a real format into ScenePool rows (the simulator is datasets_cfg/sim/)."""
