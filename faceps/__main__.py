from faceps.cli import console

console()
