"""A federation's own code for fedround: the RAND Health Insurance Experiment, one site
per insurance plan.

The federation config (``federation.yaml`` beside this package) names these by import
path; fedround imports them at the coordinator and in every site's process:

- ``randhie_federation.model:build`` — the model factory (a wide & deep network);
- ``randhie_federation.training:train`` — local training (Adam, early stopping);
- ``randhie_federation.evaluation:evaluate`` — AUC, accuracy, F1, log loss, Brier score;
- ``randhie-prepare`` (:mod:`randhie_federation.prepare`) — writes every site's files and
  ``site.yaml`` and the coordinator's held-out file from the data statsmodels ships.
"""
