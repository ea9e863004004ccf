// Command kube-apiserver runs a real kube-apiserver for lbagent's tests, with its etcd embedded in the same process.
//
//	kube-apiserver --etcd-dir DIR -- [kube-apiserver flags...]
//
// Run under the name kubectl (tests/k8s/build.py links it so), the same binary is kubectl of the same release:
// the client the tests drive the server with is never outside Kubernetes' version skew, and needs no package.
//
// The flags before "--" are this program's; the ones after it go to kube-apiserver unchanged, with
// --etcd-servers added (the embedded etcd's address). tests/k8s/apiserver.py starts it; tests/k8s/README.md says
// why etcd is embedded rather than Debian's etcd-server.
//
// etcd listens on 127.0.0.1 port 0 (the kernel picks a free port, so parallel test sessions cannot collide), does no
// fsync (its data is a test's, thrown away afterwards) and logs warnings only. kube-apiserver handles SIGTERM and
// SIGINT itself (graceful shutdown); etcd is closed after it returns. The process asks for SIGTERM when its parent
// dies, so a test run that is killed outright leaves no server behind.
package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"golang.org/x/sys/unix"
	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

const etcdStartTimeout = 60 * time.Second

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		// As Kubernetes' own cmd/kubectl does: errors are printed by kubectl's handler, with its exit codes.
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	}
	parent := os.Getppid()
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGTERM), 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "prctl(PR_SET_PDEATHSIG): %v\n", err)
		os.Exit(1)
	}
	if os.Getppid() != parent {
		os.Exit(1) // the parent died before the request took effect
	}

	ours, theirs := splitArgs(os.Args[1:])
	flags := flag.NewFlagSet("kube-apiserver", flag.ExitOnError)
	dir := flags.String("etcd-dir", "", "etcd's data directory (required; created if missing)")
	_ = flags.Parse(ours)
	if *dir == "" || flags.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: kube-apiserver --etcd-dir DIR -- [kube-apiserver flags...]")
		os.Exit(2)
	}

	etcd, err := startEtcd(*dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "embedded etcd: %v\n", err)
		os.Exit(1)
	}
	server := "http://" + etcd.Clients[0].Addr().String()
	fmt.Fprintf(os.Stderr, "embedded etcd ready at %s (data in %s)\n", server, *dir)

	command := app.NewAPIServerCommand()
	command.SetArgs(append(theirs, "--etcd-servers="+server))
	code := cli.Run(command)
	etcd.Close()
	os.Exit(code)
}

// splitArgs returns the arguments before "--" and those after it.
func splitArgs(args []string) ([]string, []string) {
	for i, arg := range args {
		if arg == "--" {
			return args[:i], args[i+1:]
		}
	}
	return args, nil
}

func startEtcd(dir string) (*embed.Etcd, error) {
	loopback := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	cfg := embed.NewConfig()
	cfg.Name = "lbagent-test"
	cfg.Dir = dir
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{"stderr"}
	cfg.ListenClientUrls = []url.URL{loopback}
	cfg.AdvertiseClientUrls = []url.URL{loopback}
	cfg.ListenPeerUrls = []url.URL{loopback}
	cfg.AdvertisePeerUrls = []url.URL{loopback}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)

	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-etcd.Server.ReadyNotify():
		return etcd, nil
	case err := <-etcd.Err():
		etcd.Close()
		return nil, err
	case <-time.After(etcdStartTimeout):
		etcd.Close()
		return nil, fmt.Errorf("not ready after %s", etcdStartTimeout)
	}
}
