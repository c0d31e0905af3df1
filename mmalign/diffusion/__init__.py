"""The diffusion core shared by REPA / U-REPA (``mmalign.repa``) and text-to-image (``mmalign.t2i``): the EMA of
the backbone weights, frozen helper networks kept out of the optimizer and the checkpoint, ODE samplers with
classifier-free guidance, Fréchet distance on a registry network, the specs of those, the image transform.

Plain torch (and torchmetrics); imports nothing from the methods.
"""
