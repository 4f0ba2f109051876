"""The data layer: the ScenePool schema, real-format sources, and YAML configuration."""
