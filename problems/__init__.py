"""Ready-made bilevel problem families: each module has its objectives, data, spec builders and
YAML presets, and a README with the math and the source paper."""
