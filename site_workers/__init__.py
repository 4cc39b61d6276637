"""Everything that runs at a site: settings, data, the data contract, local training and the
site round. Raw data is read here and never leaves; only updates and summaries do."""
