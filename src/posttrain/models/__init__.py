"""Models layer: loading and fingerprinting bases, the chat template, images, architectures, memory."""
