"""Datasets: ImageNet evaluation (imagenet.py) and the Fashion-MNIST test bed (fashion_mnist.py)."""
