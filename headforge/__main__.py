from headforge.cli import main

main()
