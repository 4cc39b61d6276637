"""Everything that runs at a site: settings, data, the data contract, local training and the
site round; and the provisioning of simulated demo sites (each one's shard and site.yaml).
Raw data is read here and never leaves; only updates and summaries do."""
