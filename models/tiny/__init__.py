"""A tiny class-conditioned pixel-space Flux trained on procedural shapes: a real model for the Chipmunk demo.

``dataset`` draws the images, ``model`` holds the config / packing / checkpoint files, ``train`` trains it,
``sampling`` samples it dense and with Chipmunk through the Flux sampler, ``demo`` is the CPU demo.
"""
