from infllm_cli.app import main

main()
