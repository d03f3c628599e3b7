"""Hardware profiles (`hardware`), the roofline cost model (`roofline`), measured latency (`measure`),
the costs files (`costs`) and `puzzle profile` (`commands`). Import the module you need: the package
itself imports nothing, so torch-free users (`puzzle solve`) stay torch-free."""
