from hierclass.cli import main

main()
