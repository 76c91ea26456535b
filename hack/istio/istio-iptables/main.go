// istio-iptables as Istio ships it inside pilot-agent (`pilot-agent istio-iptables`): the same
// cobra command, with the logging flags pilot-agent's root command adds. Built by
// scripts/build-istio for the tests that compare our rules with Istio's own, in a real kernel.
package main

import (
	"os"

	"istio.io/istio/pkg/log"
	iptables "istio.io/istio/tools/istio-iptables/pkg/cmd"
)

func main() {
	opts := log.DefaultOptions()
	cmd := iptables.GetCommand(opts)
	opts.AttachCobraFlags(cmd)
	if err := cmd.Execute(); err != nil {
		os.Exit(1)
	}
}
