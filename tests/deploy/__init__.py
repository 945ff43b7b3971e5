"""The sidecar as deployed: CLI and serve processes, config, settings, Dockerfile, Helm chart, demo, layering."""
