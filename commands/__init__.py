"""The command-line layer: one module per console command over the libraries; the libraries carry no click."""
