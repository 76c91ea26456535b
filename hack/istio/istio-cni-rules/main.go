// istio-cni-rules runs Istio's own CNI plugin (cni/pkg/plugin, the `istio-cni` binary's ADD) for
// one pod that already exists in a cluster, in dry-run mode: the plugin reads the pod from the API
// server, makes its own decision (skip gateways, DISABLE_ENVOY, istio-init pods, pods without the
// injector's status annotation, ...) and hands its iptables-restore input to istio-iptables' stub,
// which writes it to a file instead of running anything. That file is printed on stdout: empty
// when the plugin leaves the pod alone. The istiod tests compare it with what our agent builds for
// the same pod. Built by scripts/build-istio; not part of the product.
//
//	istio-cni-rules --kubeconfig FILE --namespace NS --name POD
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/skel"

	"istio.io/istio/cni/pkg/constants"
	"istio.io/istio/cni/pkg/plugin"
	"istio.io/istio/tools/istio-iptables/pkg/dependencies"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster holding the pod")
	namespace := flag.String("namespace", "", "the pod's namespace")
	name := flag.String("name", "", "the pod's name")
	flag.Parse()
	if *kubeconfig == "" || *namespace == "" || *name == "" {
		fmt.Fprintln(os.Stderr, "usage: istio-cni-rules --kubeconfig FILE --namespace NS --name POD")
		os.Exit(2)
	}
	if err := run(*kubeconfig, *namespace, *name); err != nil {
		fmt.Fprintf(os.Stderr, "istio-cni-rules: %v\n", err)
		os.Exit(1)
	}
}

func run(kubeconfig, namespace, name string) error {
	// The plugin reads its kubeconfig from a fixed name in its run directory.
	runDir, err := os.MkdirTemp("", "istio-cni-rules-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(runDir)
	raw, err := os.ReadFile(kubeconfig)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(runDir, constants.CNIPluginKubeconfName), raw, 0o600); err != nil {
		return err
	}
	out := filepath.Join(runDir, "dry-run.txt")
	if err := os.WriteFile(out, nil, 0o600); err != nil {
		return err
	}
	if err := os.Setenv(dependencies.DryRunFilePath.Name, out); err != nil {
		return err
	}
	conf, err := json.Marshal(map[string]any{
		"cniVersion":         "1.0.0",
		"name":               "istio-cni",
		"type":               "istio-cni",
		"plugin_log_level":   "error",
		"cni_agent_run_dir":  runDir,
		"exclude_namespaces": []string{"kube-system"},
		"pod_namespace":      "istio-system",
	})
	if err != nil {
		return err
	}
	// The CNI result goes to stdout; it is not ours to print.
	stdout := os.Stdout
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer devNull.Close()
	os.Stdout = devNull
	err = plugin.CmdAdd(&skel.CmdArgs{
		ContainerID: "istio-cni-rules",
		// The current network namespace: in dry-run mode nothing is changed in it.
		Netns:     "/proc/self/ns/net",
		IfName:    "eth0",
		Args:      fmt.Sprintf("K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s", namespace, name),
		StdinData: conf,
	})
	os.Stdout = stdout
	if err != nil {
		return err
	}
	text, err := os.ReadFile(out)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(text)
	return err
}
