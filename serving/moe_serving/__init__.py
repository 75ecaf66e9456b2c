"""Ray Serve application that serves a Mixture-of-Experts model with vLLM.

Importing this package is cheap: Ray and vLLM are imported only by the modules that need them.
"""

__version__ = "0.1.0"
