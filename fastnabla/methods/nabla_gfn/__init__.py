"""nabla-GFlowNet: the residual nabla-DB objective with the forward-looking trick (paper eqs. 15-19)."""
