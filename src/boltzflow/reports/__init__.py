"""boltzflow.reports"""
