"""Format converters: diffusers folders, CompVis single files, ESD weight files, erased-model exports."""
