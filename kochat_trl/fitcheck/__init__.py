"""`kochat-trl fit-check`: will a training stage fit on one GPU? A peak-memory estimate per component.

`presets` resolves the model config (a built-in preset from `resources/fitcheck_presets.json`, or a local
config), `shape` reads its exact parameter layout off a meta-device model, `settings` holds the training
settings and the GPU size, `memory` the per-component byte formulae, `components` which components each stage
holds, `estimate` sums them into one step's peak, `suggest` finds the knob that makes a stage fit, and
`report` renders the table the CLI prints.
"""
