"""What every package needs and nothing here depends on: atomic file writes, SE(2) geometry, the error base class,
the YAML file reader, and the constants the whole project shares (stage order, vehicle geometry).

The lowest package of the project: it imports no other package of ours, and every other may import it
(docs/architecture.md, "The dependency rule").
"""
