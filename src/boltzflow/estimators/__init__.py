"""boltzflow.estimators"""
