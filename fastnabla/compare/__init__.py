"""Side-by-side comparisons over seeds (analytic benchmark): presets against each other, methods against each other."""
