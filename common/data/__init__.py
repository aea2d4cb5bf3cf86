"""Image input: decoding files into arrays, reading data-set layouts and archives, batching."""
