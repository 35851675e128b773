"""The `infermesh` CLI: the top floor, above fleet/ (spec, plan, carriers) and gateway/.

main.py dispatches to commands/<name>.py; errors.py holds UserError and inputs.py the argument
parsers and output cells. Nothing in fleet/ or gateway/ imports this package.
"""
